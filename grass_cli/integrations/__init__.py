"""GRASS inside other training stacks (transformers' Trainer, TRL): imported only by
their users, so nothing here loads with the CLI."""
