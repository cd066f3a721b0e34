"""The engine: the one owner of the resident model, its weights' history and its lane."""
