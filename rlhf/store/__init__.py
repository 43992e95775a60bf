"""rlhf.store"""
