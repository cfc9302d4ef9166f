"""Repository tooling that is not part of the installed package (tests import it from a checkout)."""
