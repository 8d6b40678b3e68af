"""Analyses of SWAMP runs, built on the package's public functions and saved runs.

``connectivity``: linear mode connectivity of particles and of successive rounds;
``flatness``: the Hessian trace (Hutchinson); ``ensembles``: ensembles of particles and of
runs; ``mask_quality``: IMP retrained on another run's mask; ``lottery_pools``: Lottery
Pools (weight averages of nearby rounds).
"""
