"""model-loader: parallel, verified, resumable pull of OCI model artifacts into a shared cache."""
