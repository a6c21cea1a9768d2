def main(argv=None):
    print("sonomaly")
