"""/v1/files: uploads (purpose batch) and batch results, in the object store."""
