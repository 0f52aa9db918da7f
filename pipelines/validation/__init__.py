"""Offline validation of everything arrcoc applies to a cluster (`arrcoc validate`)."""
