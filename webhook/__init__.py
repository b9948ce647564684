"""model-cache webhook: mutates annotated pods so their model is mounted by the best path their nodes support."""
