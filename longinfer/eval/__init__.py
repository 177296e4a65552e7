"""longinfer.eval"""
