"""Every bound on what the scripts read and write, in one table.

Readers refuse what lies outside these bounds before they decompress, decode or unpickle it;
writers and the checks made before training use the same numbers, so that nothing is trained
or written that its own reader would refuse. The README's limits table states them.
"""

# --- CIFAR-10 batch files and the archive -----------------------------------------------------

IMAGES_PER_BATCH = 10_000  # as CIFAR-10's
IMAGE_BYTES = 3 * 32 * 32  # a CIFAR-10 image: uint8 R, G and B planes of 32x32
# The most one pixel takes in a pickle of any protocol: protocol 0 (from Python 3) writes bytes
# as text in which NUL, \n, \r, \x1a and \ become six-byte \uXXXX escapes; protocols 1 and 2
# write them as UTF-8 (two bytes from 0x80 up), 3 and later as they are.
PICKLED_PIXEL_BYTES = 6
PICKLED_LABEL_AND_NAME_BYTES = 128  # a label and a file name of 50 characters, any protocol
BATCH_FILE_BYTES = IMAGES_PER_BATCH * (IMAGE_BYTES * PICKLED_PIXEL_BYTES
                                       + PICKLED_LABEL_AND_NAME_BYTES) + (64 << 10)  # 177 MiB
# What unpickling one batch may build, counted over every object: the images twice (protocols
# 0-2 store bytes as text, which _codecs.encode turns into bytes), and for each image a label
# and a file name of up to LABEL_AND_NAME_OPCODES opcodes, each building up to OPCODE_BYTES
# besides its argument (an empty set, the most any opcode builds from nothing, takes 233).
OPCODE_BYTES = 256
LABEL_AND_NAME_OPCODES = 32  # a NumPy int label and a name take 28 in protocol 0, 23 in 2
UNPICKLED_BYTES = IMAGES_PER_BATCH * (2 * IMAGE_BYTES + LABEL_AND_NAME_OPCODES * OPCODE_BYTES)
# Dict and set entries cost time as well as memory: keys crafted to share a hash make each
# insertion slower than the last. A batch is a dict of four.
DICT_ENTRIES = 1024
ARCHIVE_MEMBER_BYTES = BATCH_FILE_BYTES  # each member of cifar-10-python.tar.gz
ARCHIVE_MEMBERS = 64  # the official archive has 9
TAR_HEADER_BYTES = 64 << 10  # long names and pax records, which tarfile holds in memory
DOWNLOAD_BYTES = 2 * 170_498_071  # twice the official archive

# --- checkpoints and run states -----------------------------------------------------------------

EPOCHS = 10_000  # the most a run may train (config.py): its history fits META_CHARS
WEIGHT_BYTES = 1 << 27  # a weight matrix, velocity or whitening: 4096² float64, 5792² float32
VECTOR_BYTES = 1 << 20  # a bias, mean or std: 131,072 float64 values
META_CHARS = 3 << 20  # the JSON `meta`: a state's history of EPOCHS epochs takes up to 2.7 Mi
# (and its worst JSON, 21 times that in memory, stays under 150 MB)
CLASS_NAME_CHARS = 100  # longer names break the plots' layout
NPY_HEADER_BYTES = 4096  # an archive member's .npy header (NumPy writes 128 bytes)
ZIP_ENTRY_BYTES = 1024  # an archive member's zip directory entry (NumPy's take about 80)

# --- files that describe a run or a search ----------------------------------------------------

# JSON takes up to 21 times its size in memory ([{}, {}, ...]): these keep that under 100 MB.
HISTORY_BYTES = 4 << 20  # history.json: EPOCHS epochs as train.py writes them, 300-340 each
SPACE_FILE_BYTES = 1 << 20  # --space-file
TRIALS_HEAD_BYTES = 64 << 10  # what is read of trials.json: the study and storage it names
GRID_POINTS = 10_000  # a grid search's combinations: a week of 1-minute trials

# --- pictures given to test.py --image ----------------------------------------------------------

IMAGE_PIXELS = 50_000_000  # a 48-megapixel photo fits
TILE_SIDE = 1024  # a TIFF tile may be this wide and high, or as large as the picture
