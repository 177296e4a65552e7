"""longinfer.data"""
