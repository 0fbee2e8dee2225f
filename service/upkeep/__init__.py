"""Keeping the folders and the ledger in order: start-up recovery and take-over, and
retention."""
