"""rosepo.pairs"""
