"""rosepo.eval"""
