"""The application layer: status, command and analyser registries, the decode runner."""
