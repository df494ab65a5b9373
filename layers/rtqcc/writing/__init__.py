"""Asking a model for text and paying for it: providers, prompts, token counts and their
encodings, prices, budgets and quotas, and the abort signal providers honour."""
