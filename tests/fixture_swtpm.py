"""swtpm fixtures (filled in by the TPM backend work)."""
