"""longinfer.integrations"""
