"""Dataset converters (BTCV, MSD, unlabeled folders incl. DICOM) and the synthetic phantom generator."""
