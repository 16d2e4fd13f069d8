"""Host-side data: text sources, masking and batching."""
