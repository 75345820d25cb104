"""SoftHSM2 fixtures (filled in by the PKCS#11 backend work)."""
