"""rosepo.model"""
