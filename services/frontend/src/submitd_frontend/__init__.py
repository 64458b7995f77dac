"""submitd frontend: the SMTP submission server."""
