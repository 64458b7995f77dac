"""submitctl: the operator's command line for submitd."""
