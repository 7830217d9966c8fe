"""Renderers of a leaderboard (``ptqbench.report`` builds it): numbers for people, the terminal
layout that fits any width, plots and the self-contained HTML page."""
