"""The work each pipeline component does, in plain modules named after their components (see components/)."""
