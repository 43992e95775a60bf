"""rlhf.train"""
