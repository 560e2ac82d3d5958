"""Durable state: SQLite through twisted.enterprise.adbapi."""
