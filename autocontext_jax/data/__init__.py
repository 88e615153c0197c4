"""Reading, generating and sampling 3D CT data."""
