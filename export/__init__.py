"""minicpmv-edge exporters: checkpoint -> on-device bundle."""
