"""Word lists of the guard: opposite pairs, negators, units, number words, question words and stopwords.

They describe English, not the evaluation set: each list is the general vocabulary of its kind (the programming
ones too), written before the set and not fitted to it.
"""

from __future__ import annotations

NEGATORS = frozenset("""not no never without cannot none nor neither nothing nobody nowhere noone nope""".split())

# Each line is one axis: the words on either side of "|" mean its two opposite ends.
OPPOSITES = """
enable activate on start begin launch resume unmute unpause turn_on switch_on | disable deactivate off stop end halt
    pause suspend mute turn_off switch_off kill terminate
with | without
include contain inclusive | exclude omit exclusive
add insert append create attach push prepend | remove delete drop erase destroy detach pop strip
increase raise grow increment expand enlarge upgrade up boost | decrease lower reduce shrink decrement downgrade down
    cut
maximum max largest biggest highest most greatest longest | minimum min smallest lowest least fewest shortest
more greater larger bigger higher longer taller heavier older | less fewer smaller shorter lighter younger
fast faster fastest quick quicker quickest speed_up | slow slower slowest slow_down
good better best pro pros advantage advantages benefit benefits strength strengths | bad worse worst con cons
    disadvantage disadvantages drawback drawbacks weakness weaknesses downside downsides
ascending asc increasing | descending desc decreasing reverse_order
before earlier prior previous preceding | after later next following subsequent
first top head beginning leading | last bottom tail trailing
above over upper | below under beneath
left | right
front | back rear
inside inner internal interior | outside outer external exterior
north northern | south southern
east eastern | west western
open opened | close closed shut
allow permit accept approve grant whitelist allowlist | deny forbid reject refuse revoke block blacklist denylist
    prevent disallow
encrypt encryption | decrypt decryption
encode encoding encoder | decode decoding decoder
compress compression | decompress decompression extract
serialize serialization marshal | deserialize deserialization unmarshal
zip | unzip
lock | unlock
mount | unmount
install | uninstall
import | export
upload | download
push | pull
read reader load loading | write writer save saving dump
send sender | receive receiver recipient
input | output
buy buyer purchase | sell seller
win winner | lose loser
true | false
public | private
synchronous sync | asynchronous async
mutable | immutable
visible show display reveal | invisible hide hidden conceal
expand | collapse
hot heat warm warmer | cold cool cooler colder
inbound ingress upstream | outbound egress downstream
uppercase upper_case capitalize capital | lowercase lower_case
horizontal horizontally | vertical vertically
login log_in sign_in signin | logout log_out sign_out signout
connect connected | disconnect disconnected
online | offline
forward forwards | backward backwards
plus | minus
positive | negative
odd | even
success succeed successful pass passing | failure fail failed failing
valid | invalid
legal | illegal
safe | unsafe dangerous
like love | dislike hate
always | never
agree | disagree
same similar similarity similarities | different difference differences
enter | exit leave
arrive arrival | depart departure
rise | fall
gain profit | loss
borrow borrower | lend lender
employer | employee
parent | child
teacher | student
male | female
high | low
strong stronger strongest | weak weaker weakest
heavy heavier heaviest | light lighter lightest
rich | poor
early | late
easy easier easiest simple | hard harder hardest difficult
cheap cheaper cheapest inexpensive | expensive
wide wider widest broad | narrow
thick | thin
deep | shallow
full | empty
new newer newest young | old
wet | dry
loud louder | quiet quieter
long | short
big large | small little tiny
many | few
near nearest close_to | far farthest furthest
happy | sad
light_mode | dark_mode
day daytime | night nighttime
summer | winter
sweet | sour bitter
""".strip()

UNITS = {
    "km": "km kilometer kilometers kilometre kilometres kms",
    "mi": "mi mile miles",
    "m": "meter meters metre metres",
    "cm": "cm centimeter centimeters centimetre centimetres",
    "mm": "mm millimeter millimeters",
    "in": "inch inches",
    "ft": "ft foot feet",
    "yd": "yard yards",
    "kg": "kg kilogram kilograms kilo kilos",
    "g": "gram grams",
    "lb": "lb lbs pound pounds",
    "oz": "oz ounce ounces",
    "l": "liter liters litre litres",
    "ml": "ml milliliter milliliters",
    "gal": "gallon gallons",
    "c": "celsius centigrade",
    "f": "fahrenheit",
    "k": "kelvin",
    "s": "second seconds sec secs",
    "min": "minute minutes mins",
    "h": "hour hours hr hrs",
    "day": "day days",
    "week": "week weeks",
    "month": "month months",
    "year": "year years",
    "ms": "ms millisecond milliseconds",
    "usd": "usd dollar dollars $",
    "eur": "eur euro euros €",
    "gbp": "gbp sterling £",
    "jpy": "jpy yen",
    "b": "byte bytes",
    "kb": "kb kib kilobyte kilobytes",
    "mb": "mb mib megabyte megabytes",
    "gb": "gb gib gigabyte gigabytes",
    "tb": "tb tib terabyte terabytes",
    "bit": "bit bits",
    "mph": "mph",
    "kmh": "kmh kph",
    "percent": "percent percentage %",
    "w": "watt watts",
    "kw": "kw kilowatt kilowatts",
    "v": "volt volts",
    "hz": "hz hertz",
    "ghz": "ghz gigahertz",
    "cal": "calorie calories kcal",
}

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6,
    "billion": 10**9, "dozen": 12, "half": 0.5, "twice": 2, "double": 2, "triple": 3, "single": 1,
    "once": 1, "thrice": 3, "quarter": 0.25, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5,
}
# Some number words are ordinary words too ("one of", "first", "second"): only the unambiguous ones count.
NUMBER_ONLY = frozenset(set(NUMBER_WORDS) - {"one", "first", "second", "single", "once", "double", "half", "quarter"})

# Question words that ask for a different kind of answer; "what", "how" and "which" are interchangeable.
QUESTION_KINDS = {
    "why": "why", "when": "when", "where": "where", "who": "who", "whom": "who", "whose": "whose",
    "how_many": "count", "how_much": "amount", "how_long": "duration", "how_old": "age", "how_far": "distance",
    "how_often": "frequency",
}

# Words between two swapped names that keep the question the same ("Python and Java", "Python vs Java").
SYMMETRIC = frozenset("and or vs versus , / & between compare comparing comparison with".split())

DIRECTIONAL = frozenset("to from into than onto toward towards against".split())

STOPWORDS = frozenset("""
a an the and or but if then else of at by for with about as to from in into on onto out up down over under again
is are was were be been being am do does did doing done have has had having can could should would will shall may
might must i me my mine we us our you your yours he him his she her it its they them their this that these those
there here what which who whom whose when where why how all any both each few other some such only own so too very
just also than s t don now get got make made use using used way best please tell know need want like help show
give explain write find let lets one ones thing things something anything someone am pm e.g ie etc vs via per
""".split())

TECH_NAMES = frozenset("""
python java javascript typescript js ts rust golang c c++ cpp c# csharp ruby php perl swift kotlin scala haskell
r matlab julia lua bash zsh shell powershell sql sqlite postgres postgresql mysql mariadb mongodb redis cassandra
linux ubuntu debian fedora centos windows macos mac ios android docker kubernetes k8s git github gitlab npm pip
conda react vue angular svelte django flask fastapi rails spring node nodejs deno numpy pandas pytorch torch
tensorflow keras jax sklearn scikit-learn aws gcp azure s3 ec2 lambda nginx apache kafka spark hadoop excel vim
emacs vscode chrome firefox safari html css json yaml toml xml csv http https tcp udp ssh ssl tls dns ipv4 ipv6
utf-8 ascii unicode regex gpu cpu cuda tpu llvm gcc clang cmake gradle maven jvm wasm graphql grpc
""".split())
