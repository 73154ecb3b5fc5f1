import os

#: The top of the checkout: etc/, docs/ and the other shipped files are found from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
