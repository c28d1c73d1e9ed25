if __name__ != "jt5.train":  # one module identity: never a second, top-level copy
    raise ImportError(f"import this package as jt5.train, not {__name__}")
