"""An example Shuttle plugin; the migration is in `scores`."""
