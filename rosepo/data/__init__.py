"""rosepo.data"""
