"""Task definitions and their evaluation metrics (MOSI/MOSEI, IEMOCAP, Food-101, MSR-VTT)."""
