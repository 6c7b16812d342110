"""Small models bundled with qcompile (trained on data that ships with scikit-learn)."""
