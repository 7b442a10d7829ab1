"""Recipes: settings in, components wired together, results out. No training logic lives here."""
