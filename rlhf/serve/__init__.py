"""rlhf.serve"""
