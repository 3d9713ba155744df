"""Models unlike DriveNet, declared the way a user declares theirs (zoo.toml): each goes
through push, fold, release, guard, verify and parity in tests/integration/test_zoo.py."""
