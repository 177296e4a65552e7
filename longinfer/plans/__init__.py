"""longinfer.plans"""
