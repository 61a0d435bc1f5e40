"""Block-group allocator: random operation sequences keep the buddy invariants and never leak."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.kv.allocator import BlockAllocator, runs


def check(alloc: BlockAllocator, owned: dict[int, list[int]]):
    chunks = alloc.chunks()
    free = [b for start, order in chunks for b in range(start, start + (1 << order))]
    reserved = [b for blocks in alloc.reserved().values() for b in blocks]
    held = [b for blocks in owned.values() for b in blocks]
    everything = free + reserved + held
    assert len(everything) == len(set(everything)), "a block is in two places"
    assert sorted(everything) == list(range(alloc.num_blocks)), "a block leaked"
    assert alloc.num_free == len(free) + len(reserved)
    by_start = dict(chunks)
    for start, order in chunks:
        assert start % (1 << order) == 0 and start + (1 << order) <= alloc.num_blocks, "misaligned chunk"
        assert by_start.get(start ^ (1 << order)) != order, "two free buddies were not coalesced"
    for owner, blocks in alloc.reserved().items():
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), "a reserve is not contiguous"
        assert owned[owner] and blocks[0] == owned[owner][-1] + 1, "a reserve does not follow its owner"


ops = st.lists(
    st.tuples(st.sampled_from(["grow", "grow", "free", "drop"]), st.integers(0, 5), st.integers(1, 9), st.integers(0, 8)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 70), ops=ops)
def test_random_operations_keep_the_invariants(num_blocks, ops):
    alloc = BlockAllocator(num_blocks)
    owned: dict[int, list[int]] = {o: [] for o in range(6)}
    for op, owner, n, expected in ops:
        if op == "grow" and n <= alloc.num_free:
            blocks = owned[owner]
            got = alloc.allocate(n, owner=owner, after=blocks[-1] if blocks else None, expected=expected)
            assert len(got) == n
            blocks += got
        elif op == "free":
            alloc.drop_reserve(owner)
            alloc.free(owned[owner])
            owned[owner] = []
        elif op == "drop":
            alloc.drop_reserve(owner)
        check(alloc, owned)
    for owner, blocks in owned.items():
        alloc.drop_reserve(owner)
        alloc.free(blocks)
    assert alloc.chunks() == BlockAllocator(num_blocks).chunks(), "freeing everything must coalesce fully"


def test_growth_stays_contiguous_when_memory_allows():
    alloc = BlockAllocator(256)
    a = alloc.allocate(5, owner="a", expected=20)
    b = alloc.allocate(3, owner="b", expected=4)
    for _ in range(20):  # decode growth, interleaved
        a += alloc.allocate(1, owner="a", after=a[-1])
        b += alloc.allocate(1, owner="b", after=b[-1])
    assert runs(a) == 1
    assert runs(b) <= 2  # outgrew its reserve once


def test_under_pressure_small_groups_use_every_block():
    alloc = BlockAllocator(16)
    held = [alloc.allocate(1, owner=i) for i in range(16)]  # a pool of single blocks
    assert alloc.num_free == 0
    for blocks in held[::2]:
        alloc.free(blocks)  # eight free blocks, none adjacent
    assert alloc.largest_free_group() == 1
    got = alloc.allocate(8, owner="big", expected=100)
    assert len(got) == 8 and runs(got) == 8 and alloc.num_free == 0


def test_reserves_are_reclaimed_before_anyone_is_refused():
    alloc = BlockAllocator(16)
    a = alloc.allocate(2, owner="a", expected=14)  # takes the whole pool: 2 used, 14 reserved
    assert alloc.reserved()["a"] and alloc.num_free == 14
    b = alloc.allocate(14, owner="b")
    assert len(set(a + b)) == 16 and "a" not in alloc.reserved()
