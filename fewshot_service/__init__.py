"""The fewshot REST service (FastAPI). The library is ``fewshot``; this package is HTTP only."""
