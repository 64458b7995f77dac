"""Outbound transport security for direct delivery: which TLS a destination gets (DANE, MTA-STS,
the site's own table, or opportunistic), what was verified, and the TLS-RPT counts of it."""
