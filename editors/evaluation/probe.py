"""Fixed text for the perplexity probe: plain encyclopaedic prose about no edited fact, so a
rise in its perplexity means an edit damaged the language model itself."""

PROBE_TEXT = (
    "The river rises in the hills to the north and flows south through farmland for about "
    "two hundred kilometres before it reaches the sea. Its valley has been settled since "
    "ancient times, and the towns along its banks grew rich from trade in grain, wool and "
    "timber. In the nineteenth century a railway was built beside the river, and the old "
    "harbour was enlarged so that larger ships could load there. Today most of the valley is "
    "used for agriculture, although tourism has become important in the summer months, when "
    "visitors come to walk in the hills, to swim in the lakes and to see the castles and "
    "churches of the medieval towns. The climate is mild, with warm summers and cool, wet "
    "winters, and snow is rare except on the highest ground."
)
