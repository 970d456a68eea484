"""The app's screens: home, training, runs, and the small modal dialogs."""
