"""The store: SQLAlchemy models and the repository, the only place with SQL."""
