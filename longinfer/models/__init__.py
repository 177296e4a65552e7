"""longinfer.models"""
