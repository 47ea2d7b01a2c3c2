"""Example provider hooks (see ssh_access.py)."""
