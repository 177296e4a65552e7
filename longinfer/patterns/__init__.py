"""longinfer.patterns"""
