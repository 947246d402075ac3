"""CDS Hooks 2.0: wire models, prefetch templates and resolution, cards, and the feedback store."""
