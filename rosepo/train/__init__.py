"""rosepo.train"""
